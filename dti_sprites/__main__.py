from dti_sprites.cli import main

if __name__ == "__main__":
    main()
